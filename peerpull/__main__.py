from peerpull.cli import main

raise SystemExit(main())
