from zeroserve.gpu_worker.proc import main

main()
