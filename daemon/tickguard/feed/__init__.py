"""Everything between the network and the price book: protocols, DNS, the
connection supervisor and the REST fallback poll."""
