"""What the spider hands the pipeline: one ruling, its fields in full and the photos still to fetch."""
import scrapy


class RulingItem(scrapy.Item):
    rrdc_no = scrapy.Field()    # the portal's ruling number, the store's key
    category = scrapy.Field()   # rulings | council | committee
    fields = scrapy.Field()     # portal field name -> full text (detail values, <em> stripped)
    photos = scrapy.Field()     # [{"url", "name" (store file name), "source" (the portal's file name)}]
