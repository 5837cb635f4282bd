from swav.cli import main

raise SystemExit(main())
