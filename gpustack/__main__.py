from gpustack.cli import main

raise SystemExit(main())
