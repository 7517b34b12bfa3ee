from workloads.sweep.driver import main

main()
