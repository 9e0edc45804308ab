"""Pictures, captions, masks, buckets, augmentation and the dataset check. The pictures' API is
this package's own (``from dreambooth import data``; ``data.collect_pictures``)."""
from dreambooth.data.pictures import *  # noqa: F401,F403
