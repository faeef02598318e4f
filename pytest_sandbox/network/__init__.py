"""Stage 2b: addresses, network namespaces, the lab, the reference proxy, third-party proxies."""
