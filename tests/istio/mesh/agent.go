package mesh

import (
	"os"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	httpwasm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/wasm/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"istio.io/istio/pkg/util/sets"
	"istio.io/istio/pkg/wasm"
)

// Agent is the sidecar agent's Wasm module cache (pkg/wasm), keeping its
// files in a folder, talking plain HTTP to the registries named insecure
// (the agent's WASM_INSECURE_REGISTRIES).
type Agent struct {
	Cache *wasm.LocalFileCache
}

// NewAgent makes the agent's cache in `dir`.
func NewAgent(dir string, insecureRegistries ...string) *Agent {
	// The agent makes its folder at startup; the cache expects it.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		panic(err)
	}
	return &Agent{Cache: wasm.NewLocalFileCache(dir, wasm.Options{
		InsecureRegistries: sets.New(insecureRegistries...),
	})}
}

// Close stops the cache's purge loop.
func (a *Agent) Close() { a.Cache.Cleanup() }

// Rewrite does what the agent does with an ECDS response before Envoy sees
// it: every remote Wasm module is fetched into the cache and the resource
// rewritten to the local file; a failed fetch replaces the filter with an
// allow-all (FAIL_OPEN) or deny-all RBAC filter. The input is not changed.
// The error is the one the agent would NACK with (none when the RBAC
// replacement worked).
func (a *Agent) Rewrite(resources []*anypb.Any) ([]*anypb.Any, error) {
	out := make([]*anypb.Any, len(resources))
	for i, r := range resources {
		out[i] = proto.Clone(r).(*anypb.Any)
	}
	err := wasm.MaybeConvertWasmExtensionConfig(out, a.Cache)
	return out, err
}

// LocalModule is the local file a rewritten Wasm extension config runs, or
// "" when it is not a Wasm filter with a local module (e.g. the RBAC
// replacement).
func LocalModule(ec *core.TypedExtensionConfig) string {
	w := &httpwasm.Wasm{}
	if ec.GetTypedConfig().UnmarshalTo(w) != nil {
		return ""
	}
	return w.GetConfig().GetVmConfig().GetCode().GetLocal().GetFilename()
}
