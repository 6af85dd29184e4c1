from uksm.cli.main import main

raise SystemExit(main())
