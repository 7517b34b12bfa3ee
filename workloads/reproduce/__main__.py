from workloads.reproduce.driver import main

main()
