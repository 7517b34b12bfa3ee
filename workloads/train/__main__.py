from workloads.train.driver import main

main()
