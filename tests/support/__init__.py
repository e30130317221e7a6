"""What the tests share that is not a test: servers, proxies, workers, helpers."""
