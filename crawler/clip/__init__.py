"""Scrapy project for the Korea Customs Service rulings portal (CLIP): spider, pipelines, middlewares, settings."""
