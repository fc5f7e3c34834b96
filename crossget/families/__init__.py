"""Model families: where each supported Hugging Face model merges.

Each module defines one :class:`~crossget.families.base.Family` subclass and its
instance ``FAMILY``; :mod:`crossget.families.registry` maps model classes to them.
"""
