from tickguard.cli import main

raise SystemExit(main())
