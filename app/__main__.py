from repomem.app.cli import main

main()
