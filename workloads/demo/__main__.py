from workloads.demo.driver import main

main()
