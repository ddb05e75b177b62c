from captioner.cli.main import main

main()
