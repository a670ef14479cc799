from tcr_mirror.cli import main

raise SystemExit(main())
