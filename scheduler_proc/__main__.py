from zeroserve.scheduler_proc.proc import main

main()
