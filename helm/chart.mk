# helm/chart.mk: targets of this part (included by the top-level Makefile).
