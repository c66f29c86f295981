from lmul.cli import main

raise SystemExit(main())
