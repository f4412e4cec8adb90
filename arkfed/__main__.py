from arkfed.cli import main

main()
