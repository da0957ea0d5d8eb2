"""dinocluster: the command line, the local launcher and the demo (the services are the
packages ``embedding_service`` and ``clustering_service``; the client is ``shared``)."""
