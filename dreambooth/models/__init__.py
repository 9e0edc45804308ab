"""What a checkpoint is and how it is read and written: the components type, loading and
detection, export to single files, the model families (what differs between SD1, SD2, SDXL...)
and the adapter kinds (LoRA, LoCon, LoHa, LoKr), and the objective's maths. Imports only
``dreambooth.common``."""
