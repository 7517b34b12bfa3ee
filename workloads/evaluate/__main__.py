from workloads.evaluate.driver import main

main()
