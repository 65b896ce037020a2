from engine.server.app import main

main()
