"""Training stages: pretrain, finetune, svm, bboxreg, train (each a module with run(cfg))."""
