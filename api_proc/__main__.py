from zeroserve.api_proc.server import main

main()
