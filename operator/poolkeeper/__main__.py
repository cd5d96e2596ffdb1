from poolkeeper.cli import main

raise SystemExit(main())
