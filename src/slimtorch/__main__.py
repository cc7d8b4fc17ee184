from slimtorch.cli.main import main

main()
