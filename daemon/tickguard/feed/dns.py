"""Resolving the feed's host through a chain that survives a DNS outage.

Stages, in order: primary (`dns.servers`, or the system resolver), fallback
(`dns.fallback_servers`, through dnspython), then the last-known-good
addresses kept in the store. Each stage is capped by `dns.timeout`. Once the
primary has failed, lookups start at the fallback stage and go back to the
primary only on a health check (every `dns_check_every`-th attempt) or once it
answers again.

The address found is only the TCP destination: TLS server name, certificate
check and Host header keep using the URL's host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

from tickguard.config import DnsConfig, Nameserver
from tickguard.errors import FeedError, StoreError
from tickguard.metrics import Metrics
from tickguard.status import DnsStatus
from tickguard.store import AsyncStore, Store, as_async

log = logging.getLogger(__name__)

PRIMARY, FALLBACK, LAST_KNOWN_GOOD, LITERAL = "primary", "fallback", "last_known_good", "literal"


@dataclass(frozen=True, slots=True)
class Resolved:
    addresses: tuple[str, ...]
    stage: str  # primary | fallback | last_known_good | literal
    via: str  # who answered, for logs and health: "system resolver", "1.1.1.1", ...


class ResolverChain:
    def __init__(
        self,
        config: DnsConfig,
        store: Store | AsyncStore | None,
        metrics: Metrics,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._store = as_async(store) if store is not None else None
        self._metrics = metrics
        self._wall = wall
        self.primary_failed = False
        self.last: Resolved | None = None
        self.last_error = ""

    def status(self) -> DnsStatus:
        """What the chain says about itself now, as a frozen value (tickguard.status)."""
        last = self.last
        return DnsStatus(
            primary_failed=self.primary_failed,
            last_stage=last.stage if last is not None else None,
            resolved_via=last.via if last is not None else None,
            last_error=self.last_error,
        )

    async def resolve(self, host: str, port: int, *, health_check: bool = False) -> Resolved:
        """Addresses for `host`, or FeedError("dns") when every stage failed."""
        if _is_ip(host):
            return Resolved((host,), LITERAL, "literal address")
        failures: list[str] = []
        if not self.primary_failed or health_check:
            primary_name = (
                _describe(self.config.servers) if self.config.servers else "system resolver"
            )
            try:
                addresses = await self._primary(host, port)
            except FeedError as exc:
                self._count(PRIMARY, ok=False)
                failures.append(f"{primary_name} failed for {host}: {exc.detail}")
                self.primary_failed = True
            else:
                self._count(PRIMARY, ok=True)
                if self.primary_failed:
                    log.info("[DNS] %s answers for %s again", primary_name, host)
                self.primary_failed = False
                return await self._found(host, Resolved(addresses, PRIMARY, primary_name), failures)
        if self.config.fallback_servers:
            try:
                addresses, server = await _query(
                    host, self.config.fallback_servers, self.config.timeout
                )
            except FeedError as exc:
                self._count(FALLBACK, ok=False)
                failures.append(f"fallback resolvers failed for {host}: {exc.detail}")
            else:
                self._count(FALLBACK, ok=True)
                return await self._found(host, Resolved(addresses, FALLBACK, server), failures)
        known = await self._store.known_addresses(host) if self._store is not None else None
        if known:
            self._count(LAST_KNOWN_GOOD, ok=True)
            addresses_lkg, at = known
            age = max(0.0, self._wall() - at)
            via = f"last-known-good address ({_age(age)} old)"
            return await self._found(
                host, Resolved(tuple(addresses_lkg), LAST_KNOWN_GOOD, via), failures
            )
        self._count(LAST_KNOWN_GOOD, ok=False)
        self.last_error = "; ".join(failures) or f"no address known for {host}"
        log.warning("[DNS] %s; no last-known-good address", self.last_error)
        raise FeedError("dns", self.last_error)

    async def _found(self, host: str, resolved: Resolved, failures: list[str]) -> Resolved:
        if resolved.stage != PRIMARY:
            self._metrics.dns_fallbacks.inc()
            if failures:
                log.warning("[DNS] %s; resolved via %s", "; ".join(failures), resolved.via)
        if resolved.stage in (PRIMARY, FALLBACK) and self._store is not None:
            try:
                await self._store.remember_addresses(host, list(resolved.addresses), self._wall())
            except StoreError as exc:  # a standby may not write the shared store: not kept
                log.debug("[DNS] %s not kept as last-known-good: %s", host, exc)
        self.last = resolved
        self.last_error = "; ".join(failures)
        return resolved

    def _count(self, stage: str, *, ok: bool) -> None:
        self._metrics.dns_lookups.labels(stage, "ok" if ok else "fail").inc()

    async def _primary(self, host: str, port: int) -> tuple[str, ...]:
        if self.config.servers:
            addresses, _ = await _query(host, self.config.servers, self.config.timeout)
            return addresses
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise FeedError("dns", f"timed out after {self.config.timeout:g}s") from None
        except OSError as exc:
            raise FeedError("dns", str(exc)) from None
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise FeedError("dns", "no addresses")
        return addresses


async def _query(
    host: str, servers: Sequence[Nameserver], timeout: float
) -> tuple[tuple[str, ...], str]:
    """A and AAAA through `servers` in order; the whole stage capped at `timeout`."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(s.host, s.port) for s in servers]
    resolver.timeout = max(0.05, timeout / len(servers))  # per server, so later ones get a turn
    resolver.lifetime = timeout
    resolver.retry_servfail = False
    try:
        async with asyncio.timeout(timeout):  # dnspython's lifetime can overrun
            answers = await asyncio.gather(
                resolver.resolve(host, "A", raise_on_no_answer=False),
                resolver.resolve(host, "AAAA", raise_on_no_answer=False),
                return_exceptions=True,
            )
    except TimeoutError:
        raise FeedError("dns", f"timed out after {timeout:g}s") from None
    addresses: list[str] = []
    server = ""
    errors: list[str] = []
    for answer in answers:
        if isinstance(answer, BaseException):
            if not isinstance(answer, dns.exception.DNSException):
                raise answer
            errors.append(_dns_why(answer))
            continue
        addresses.extend(str(rr.address) for rr in answer)
        if answer.rrset is not None and not server:
            server = _server_of(answer, servers)
    if not addresses:
        raise FeedError("dns", errors[0] if errors else "no A or AAAA records")
    return tuple(dict.fromkeys(addresses)), server


def _server_of(answer: Any, servers: Sequence[Nameserver]) -> str:
    address = getattr(answer, "nameserver", None)
    port = getattr(answer, "port", None)
    for server in servers:
        if server.host == address and (port is None or server.port == port):
            return str(server)
    return str(address)


def _dns_why(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "no such domain"
    if isinstance(exc, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no nameserver answered"
    return exc.__class__.__name__


def _describe(servers: Sequence[Nameserver]) -> str:
    return "resolver " + ", ".join(str(s) for s in servers)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


class AiohttpResolver(AbstractResolver):
    """Lets aiohttp (the REST poll, broker calls) resolve through the same chain."""

    def __init__(self, chain: ResolverChain) -> None:
        self._chain = chain

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            resolved = await self._chain.resolve(host, port)
        except FeedError as exc:
            raise OSError(f"cannot resolve {host}: {exc.detail}") from None  # aiohttp's contract
        results: list[ResolveResult] = []
        for address in resolved.addresses:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (socket.AF_UNSPEC, fam):
                continue
            results.append(
                ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0, flags=0)
            )
        if not results:
            raise OSError(f"no {family.name} address for {host}")
        return results

    async def close(self) -> None:
        return None
