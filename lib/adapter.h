// defines: AdapterModule, AdapterConfig, Adapter, adapter_save, adapter_load, adapter_alloc,
//          adapter_free, adapter_scale, adapter_check_shapes, adapter_modules_parse, adapter_A/B
// A LoRA adapter as a PEFT adapter directory holds it, in both directions:
//   DIR/adapter_config.json        peft_type "LORA", r, lora_alpha, lora_dropout, target_modules,
//                                  use_rslora, bias "none", task_type "CAUSAL_LM", ...
//   DIR/adapter_model.safetensors  per layer i and targeted module, float32:
//     base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   (r, in)
//     base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight   (out, r)
//     base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
// The layer computes y = W x + scale * B (A dropout(x)), scale = alpha / r (alpha / sqrt(r) with
// rsLoRA). What we write is what PEFT 0.21 writes (save_pretrained), so PeftModel.from_pretrained
// loads it unchanged; what we read is that, plus F16/BF16 tensors (converted to float32).
// Refused on load, each with a message naming the file and the field: other peft_type, DoRA,
// bias other than "none", modules_to_save, rank_pattern/alpha_pattern, layers_to_transform,
// trainable tokens, a module targeted in some layers but not others, adapter_model.bin (pickle).
#ifndef ADAPTER_H
#define ADAPTER_H

#include <stddef.h>

#include "err.h"

// The seven Linear layers of a Llama block that LoRA can target, in PEFT's naming order.
typedef enum {
    ADAPTER_Q, ADAPTER_K, ADAPTER_V, ADAPTER_O, ADAPTER_GATE, ADAPTER_UP, ADAPTER_DOWN,
    ADAPTER_NMODULES
} AdapterModule;

const char *adapter_module_short(AdapterModule m);    // "q", "gate" (our --targets spelling)
const char *adapter_module_peft(AdapterModule m);     // "q_proj", "gate_proj"
const char *adapter_module_parent(AdapterModule m);   // "self_attn" or "mlp"

// Parse a comma-separated list of modules ("q,k,v,o,gate,up,down", PEFT names like "q_proj"
// also accepted, "all" = the seven) into a bit mask of 1u << AdapterModule. -1 on an unknown
// name or an empty list.
int adapter_modules_parse(const char *list, unsigned *mask, Err *err);

typedef struct {
    int rank;                 // r
    double alpha;             // lora_alpha
    double dropout;           // lora_dropout (applied in training only; recorded for PEFT)
    int use_rslora;           // scale alpha / sqrt(r) instead of alpha / r
    unsigned modules;         // bit mask of 1u << AdapterModule
    char base_model[1024];    // base_model_name_or_path; "" is written as null
} AdapterConfig;

// The factor applied to B A x: alpha / r, or alpha / sqrt(r) with rsLoRA.
float adapter_scale(const AdapterConfig *cfg);

typedef struct {
    AdapterConfig cfg;
    int n_layers;
    int in_dim[ADAPTER_NMODULES];    // input features of the base Linear = A's columns
    int out_dim[ADAPTER_NMODULES];   // output features of the base Linear = B's rows
    // Indexed [layer * ADAPTER_NMODULES + module]; row-major float32; NULL exactly where the
    // module is not in cfg.modules (every targeted module is present in every layer).
    float **A;                       // -> (rank, in_dim[module])
    float **B;                       // -> (out_dim[module], rank)
    void *storage;                   // what adapter_alloc/adapter_load own; NULL in a view
} Adapter;

static inline float *adapter_A(const Adapter *a, int layer, AdapterModule m)
{
    return a->A[(size_t)layer * ADAPTER_NMODULES + m];
}
static inline float *adapter_B(const Adapter *a, int layer, AdapterModule m)
{
    return a->B[(size_t)layer * ADAPTER_NMODULES + m];
}

// A zero-filled adapter owning its tensors, for the modules in cfg->modules. in_dim/out_dim
// are indexed by AdapterModule (all seven, even untargeted ones, may be given; only targeted
// ones are used). NULL on bad arguments or out of memory.
Adapter *adapter_alloc(const AdapterConfig *cfg, int n_layers, const int in_dim[ADAPTER_NMODULES],
                       const int out_dim[ADAPTER_NMODULES], Err *err);

// A view over tensors that live elsewhere (the trainer's LoRA parameters): fills *a, allocating
// only the two pointer tables (release them with adapter_view_release). The caller then sets
// a->A[...] / a->B[...] for each targeted (layer, module).
int adapter_view_init(Adapter *a, const AdapterConfig *cfg, int n_layers,
                      const int in_dim[ADAPTER_NMODULES], const int out_dim[ADAPTER_NMODULES],
                      Err *err);
void adapter_view_release(Adapter *a);

// Write DIR/adapter_model.safetensors and DIR/adapter_config.json (each atomically: temp file,
// fsync, rename), creating DIR if missing. The bytes depend only on the adapter's contents.
int adapter_save(const Adapter *a, const char *dir, Err *err);

// Read a PEFT LoRA adapter directory (or the path of its adapter_config.json). NULL with a
// message naming the file and what is wrong or unsupported.
Adapter *adapter_load(const char *dir, Err *err);

// Check that the adapter fits a model: same number of layers, and the dims of every targeted
// module match. The message names the tensor and both shapes.
int adapter_check_shapes(const Adapter *a, int n_layers, const int in_dim[ADAPTER_NMODULES],
                         const int out_dim[ADAPTER_NMODULES], Err *err);

// Frees an adapter from adapter_alloc or adapter_load (NULL is allowed).
void adapter_free(Adapter *a);

#endif
