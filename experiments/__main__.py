from experiments.reproduce import main

main()
