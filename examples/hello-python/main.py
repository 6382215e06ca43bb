print("Hello from NanoGrid!")
