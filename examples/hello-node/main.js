console.log('Hello from NanoGrid!');
