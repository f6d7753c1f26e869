"""The embedded model's world: captioned shapes (``data``), the adherence judge (``judge``), training (``train``)."""
