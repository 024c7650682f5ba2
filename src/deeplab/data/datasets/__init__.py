"""One module per data-set family; :mod:`deeplab.data` holds the name -> class table."""
