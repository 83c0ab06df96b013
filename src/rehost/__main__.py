from rehost.cli.app import main

main()
