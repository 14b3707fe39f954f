from cryptotui.cli import main

main()
