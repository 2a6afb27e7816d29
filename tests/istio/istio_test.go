// Tests of istio/ by Istio's own code: istiod's config pipeline for the
// frontend sidecar, and the sidecar agent's Wasm fetcher against a real
// registry. Run by `cargo test -p mesh-testkit --test istio`, which starts
// the registry, pushes the filters with `cargo xtask push` and sets
// MESH_REGISTRY, MESH_PUSHED and MESH_ISTIO_OUT; it then loads what these
// tests write into MESH_ISTIO_OUT into a real Envoy.
package istio

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	httpwasm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/wasm/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"mesh-filters/tests/istio/mesh"
)

// The order README "Istio" claims: phase AUTHN, AUTHZ, STATS, then higher
// priority first.
var readmeOrder = []string{"mesh-metrics", "mesh-ratelimit", "mesh-lb-hints", "mesh-circuit-breaker"}

// The suffix 1.30+ gives the TrafficExtension it translates a WasmPlugin to.
var nameSuffix = map[string]string{"wasmplugins": "~istio-translated-wasmplugin", "trafficextensions": ""}

var failurePolicy = map[string]string{"FAIL_OPEN": "FAIL_OPEN", "FAIL_CLOSE": "FAIL_CLOSED", "FAIL_RELOAD": "FAIL_RELOAD"}

// env is a setting the Rust test passes; without it the test cannot run.
func env(t *testing.T, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set: run these tests by `cargo test -p mesh-testkit --test istio` "+
			"(it starts a registry, pushes the filters and sets MESH_REGISTRY, MESH_PUSHED, MESH_ISTIO_OUT)", name)
	}
	return v
}

func pushed(t *testing.T) mesh.Pushed {
	p, err := mesh.ReadPushed(env(t, "MESH_PUSHED"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// manifests is istio/<form> + the routing, pointed at the local registry.
func manifests(t *testing.T, form, format string, pin mesh.Pin) string {
	t.Helper()
	yaml, err := mesh.Manifests(form)
	if err != nil {
		t.Fatal(err)
	}
	yaml, err = mesh.PointAt(yaml, env(t, "MESH_REGISTRY"), format, pin, pushed(t))
	if err != nil {
		t.Fatal(err)
	}
	return yaml
}

func wasmOf(t *testing.T, ec *core.TypedExtensionConfig) *httpwasm.Wasm {
	t.Helper()
	w := &httpwasm.Wasm{}
	if err := ec.GetTypedConfig().UnmarshalTo(w); err != nil {
		t.Fatalf("%s is not a Wasm filter (%s): %v", ec.GetName(), ec.GetTypedConfig().GetTypeUrl(), err)
	}
	return w
}

func module(t *testing.T, filter string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(mesh.RepoRoot(), "dist", filter+".wasm"))
	if err != nil {
		t.Fatalf("%v (cargo xtask build writes dist/)", err)
	}
	return b
}

// checkLocalModules asserts every rewritten resource runs its filter's
// module from a local file holding exactly dist/<filter>.wasm.
func checkLocalModules(t *testing.T, what string, rewritten []*anypb.Any, plugins []mesh.Plugin) {
	t.Helper()
	for i, r := range rewritten {
		ec := mesh.ExtensionConfig(t, r)
		vm := wasmOf(t, ec).GetConfig().GetVmConfig()
		file := vm.GetCode().GetLocal().GetFilename()
		if file == "" {
			t.Errorf("%s: %s was not rewritten to a local file: %v", what, ec.GetName(), vm.GetCode())
			continue
		}
		got, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if filter := plugins[i].Filter(); !bytes.Equal(got, module(t, filter)) {
			t.Errorf("%s: %s: the fetched module (%d bytes) differs from dist/%s.wasm", what, ec.GetName(), len(got), filter)
		}
		for k := range vm.GetEnvironmentVariables().GetKeyValues() {
			if strings.HasPrefix(k, "ISTIO_META_") {
				t.Errorf("%s: the agent left %s for Envoy", what, k)
			}
		}
	}
}

// inOrder returns the plugins sorted as `names` (metadata names) says.
func inOrder(t *testing.T, plugins []mesh.Plugin, names []string) []mesh.Plugin {
	t.Helper()
	var out []mesh.Plugin
	for _, n := range names {
		for _, p := range plugins {
			if p.Name == n {
				out = append(out, p)
			}
		}
	}
	if len(out) != len(plugins) {
		t.Fatalf("plugins %v, expected %v", plugins, names)
	}
	return out
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	var data []byte
	var err error
	if m, ok := v.(proto.Message); ok {
		data, err = protojson.MarshalOptions{UseProtoNames: true, Multiline: true}.Marshal(m)
	} else {
		data, err = json.MarshalIndent(v, "", "  ")
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeExtensions writes ECDS resources as a JSON list of
// TypedExtensionConfigs (dir/ecds.json), and the filter each one runs
// (dir/filters.json).
func writeExtensions(t *testing.T, dir string, resources []*anypb.Any, plugins []mesh.Plugin) {
	t.Helper()
	var filters []string
	for _, p := range plugins {
		filters = append(filters, p.Filter())
	}
	writeJSON(t, filepath.Join(dir, "filters.json"), filters)
	var list []json.RawMessage
	for _, r := range resources {
		data, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(mesh.ExtensionConfig(t, r))
		if err != nil {
			t.Fatal(err)
		}
		list = append(list, data)
	}
	writeJSON(t, filepath.Join(dir, "ecds.json"), list)
}

// TestIstiodAndTheAgentMakeOfTheManifests: both manifest forms through
// istiod for the frontend sidecar, then through the agent's rewrite, with
// the modules from the local registry (artifact format, by tag).
func TestIstiodAndTheAgentMakeOfTheManifests(t *testing.T) {
	out := env(t, "MESH_ISTIO_OUT")
	for _, form := range []string{"wasmplugins", "trafficextensions"} {
		t.Run(form, func(t *testing.T) {
			yaml := manifests(t, form, "artifact", mesh.ByTag)
			plugins, err := mesh.Plugins(yaml)
			if err != nil {
				t.Fatal(err)
			}
			plugins = inOrder(t, plugins, readmeOrder)
			g := mesh.Generate(t, yaml)

			var want []string
			for _, p := range plugins {
				want = append(want, "extensions.istio.io/trafficextension/"+p.Namespace+"."+p.Name+nameSuffix[form])
			}
			if !reflect.DeepEqual(g.ECDSFilters, want) {
				t.Fatalf("ECDS filters on the outbound listener: got %v, README's order is %v", g.ECDSFilters, want)
			}
			if last := g.HTTPFilters[len(g.HTTPFilters)-1]; last != "envoy.filters.http.router" {
				t.Errorf("last HTTP filter %s", last)
			}
			for i, r := range g.Extensions {
				p := plugins[i]
				ec := mesh.ExtensionConfig(t, r)
				if ec.GetName() != want[i] {
					t.Errorf("ECDS resource %s, wanted %s", ec.GetName(), want[i])
				}
				c := wasmOf(t, ec).GetConfig()
				if got := c.GetName(); got != p.Namespace+"."+p.Name+nameSuffix[form] {
					t.Errorf("%s: plugin name %q", p.Name, got)
				}
				if c.GetRootId() != p.PluginName {
					t.Errorf("%s: root_id %q, pluginName %q", p.Name, c.GetRootId(), p.PluginName)
				}
				if id := c.GetVmConfig().GetVmId(); id != "" {
					t.Errorf("%s: vm_id %q", p.Name, id)
				}
				if got := c.GetFailurePolicy().String(); got != failurePolicy[p.FailStrategy] {
					t.Errorf("%s: failStrategy %s gave failure_policy %s", p.Name, p.FailStrategy, got)
				}
				if rt := c.GetVmConfig().GetRuntime(); rt != "envoy.wasm.runtime.v8" {
					t.Errorf("%s: runtime %s", p.Name, rt)
				}
				if uri := c.GetVmConfig().GetCode().GetRemote().GetHttpUri().GetUri(); uri != p.URL {
					t.Errorf("%s: module from %q, manifest url %q", p.Name, uri, p.URL)
				}
				sv := &wrapperspb.StringValue{}
				if err := c.GetConfiguration().UnmarshalTo(sv); err != nil {
					t.Fatalf("%s: configuration is not a StringValue: %v", p.Name, err)
				}
				var got any
				if err := json.Unmarshal([]byte(sv.GetValue()), &got); err != nil {
					t.Fatalf("%s: configuration is not JSON: %v\n%s", p.Name, err, sv.GetValue())
				}
				if !reflect.DeepEqual(got, p.PluginConfig) {
					t.Errorf("%s: configuration %s differs from pluginConfig %v", p.Name, sv.GetValue(), p.PluginConfig)
				}
			}

			agent := mesh.NewAgent(filepath.Join(out, "cache", form), registryHost(t))
			defer agent.Close()
			rewritten, err := agent.Rewrite(g.Extensions)
			if err != nil {
				t.Fatalf("the agent refused the ECDS resources: %v", err)
			}
			checkLocalModules(t, form, rewritten, plugins)

			writeJSON(t, filepath.Join(out, form, "http-filters.json"), g.HTTPFilters)
			writeJSON(t, filepath.Join(out, form, "route-config.json"), g.RouteConfig)
			writeExtensions(t, filepath.Join(out, form), rewritten, plugins)
		})
	}
}

// TestIstioNamesTheRoutesAfterTheVirtualService: the outbound routes for
// reviews are the VirtualService's `http[].name`s, in its order.
func TestIstioNamesTheRoutesAfterTheVirtualService(t *testing.T) {
	yaml, err := mesh.Manifests("wasmplugins")
	if err != nil {
		t.Fatal(err)
	}
	g := mesh.Generate(t, yaml)
	var names []string
	for _, vh := range g.RouteConfig.GetVirtualHosts() {
		if vh.GetName() == "reviews.shop.svc.cluster.local:9080" {
			for _, r := range vh.GetRoutes() {
				names = append(names, r.GetName())
			}
		}
	}
	if want := []string{"reviews-v2", "reviews-v1", "reviews"}; !reflect.DeepEqual(names, want) {
		t.Errorf("routes of reviews: %v, the VirtualService names %v", names, want)
	}
}
