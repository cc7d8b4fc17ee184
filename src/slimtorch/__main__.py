from slimtorch.cli.entry import main

main()
