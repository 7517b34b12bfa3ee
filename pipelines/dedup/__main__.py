from pipelines.dedup.job import main

main()
