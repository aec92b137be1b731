"""Knowledge distillation: KD methods (registry `kd`), feature capture, teachers, teacher-output cache.

Every method is an nn.Module built from the captured feature shapes; its forward is
`loss(student: Outputs, teacher: Outputs, y, idx) -> Tensor`. Modules hold any trainable adapters.
"""

from modrun.core.registry import KD_METHODS

_M = "modrun.methods.distill.methods_logit"
KD_METHODS.lazy("kd", f"{_M}:HintonKD", "KL of temperature-softened logits (Hinton et al. 2015)")
KD_METHODS.lazy("dkd", f"{_M}:DKD", "decoupled KD: target + non-target class parts (Zhao et al. CVPR 2022)")
KD_METHODS.lazy("dist", f"{_M}:DIST", "inter/intra-class Pearson correlation of predictions (Huang et al. 2022)")
KD_METHODS.lazy("logit_std", f"{_M}:LogitStd", "KD on z-score standardised logits (Sun et al. CVPR 2024)")
_D = "modrun.methods.distill.methods_divergence"
KD_METHODS.lazy("reverse_kl", f"{_D}:ReverseKL", "reverse KL(student || teacher), mode-seeking (MiniLLM, Gu 2024)")
KD_METHODS.lazy("jsd", f"{_D}:GeneralizedJSD", "generalised Jensen-Shannon JSD(beta) of GKD (Agarwal et al. 2024)")
_F = "modrun.methods.distill.methods_feature"
KD_METHODS.lazy("fitnet", f"{_F}:FitNet", "hint regression of features through a 1x1 adapter (Romero et al. 2015)")
KD_METHODS.lazy("cosine", f"{_F}:CosineHidden", "1 - cosine of hidden states, per token (DistilBERT, Sanh et al. 2019)")
KD_METHODS.lazy("at", f"{_F}:AT", "attention transfer: spatial attention maps (Zagoruyko & Komodakis 2017)")
KD_METHODS.lazy("sp", f"{_F}:SP", "similarity-preserving batch Gram matrices (Tung & Mori ICCV 2019)")
KD_METHODS.lazy("vid", f"{_F}:VID", "variational information distillation, Gaussian likelihood (Ahn et al. 2019)")
KD_METHODS.lazy("reviewkd", f"{_F}:ReviewKD", "review mechanism: ABF fusion + hierarchical context loss (Chen 2021)")
_R = "modrun.methods.distill.methods_relation"
KD_METHODS.lazy("pkt", f"{_R}:PKT", "probabilistic knowledge transfer of cosine kernels (Passalis & Tefas 2018)")
KD_METHODS.lazy("rkd", f"{_R}:RKD", "relational KD: pairwise distances and triplet angles (Park et al. 2019)")
KD_METHODS.lazy("crd", f"{_R}:CRD", "contrastive representation distillation, memory bank (Tian et al. 2020)")

# keys of a kd term that the runner reads; the others are the method's own arguments
TERM_KEYS = {"name", "weight", "student_layer", "teacher_layer", "warmup_epochs"}
