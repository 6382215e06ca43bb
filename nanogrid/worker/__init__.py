"""One worker process: the receive -> run -> publish pipeline and its SQS, S3, Redis and
CloudWatch adapters."""
