"""The synthetic world of the tiny default: scenes of coloured shapes, their paragraphs and renderings
(synthetic), how faithfully an image shows one (faithfulness), and the fixed evaluation set (eval_set).
At the bottom of the package: the data set, the tiny models, validation and `para-train evaluate` read it."""
