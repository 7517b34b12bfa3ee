from workloads.reference.driver import main

main()
