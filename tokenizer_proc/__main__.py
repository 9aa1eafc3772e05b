from zeroserve.tokenizer_proc.proc import main

main()
