"""The CLIP rulings crawler: a Scrapy project (`clip/`), the local portal stand-in, the demo crawl and a benchmark."""
