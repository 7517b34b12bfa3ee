from workloads.make_pairs.driver import main

main()
