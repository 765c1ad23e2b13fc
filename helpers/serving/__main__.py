from helpers.serving.stack import main

main()
