"""The top layer: ``uksm``'s command line (main), the cluster commands,
the task verbs, ``uksm top`` and ``uksm logs``.  Nothing imports it but
``uksm.__main__``."""
