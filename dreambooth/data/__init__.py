"""Pictures, captions, masks, buckets, augmentation, identifiers and the dataset check. The
package's own names are its API (``from dreambooth import data``; ``data.collect_pictures``)."""
from dreambooth.data.augment import *  # noqa: F401,F403
from dreambooth.data.identifiers import *  # noqa: F401,F403
from dreambooth.data.pictures import *  # noqa: F401,F403
