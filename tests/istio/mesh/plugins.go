package mesh

import (
	"encoding/json"
	"fmt"
	"strings"

	"sigs.k8s.io/yaml"
)

// Plugin is what one WasmPlugin or TrafficExtension manifest says, read
// independently of Istio (to compare with what Istio makes of it).
type Plugin struct {
	Kind, Name, Namespace string
	Phase                 string
	Priority              float64
	URL, FailStrategy     string
	PluginName            string
	PluginConfig          any
}

// Filter is the filter the plugin's image is, from its URL (`…/<filter>:…`).
func (p Plugin) Filter() string {
	last := p.URL[strings.LastIndex(p.URL, "/")+1:]
	if i := strings.IndexAny(last, ":@"); i >= 0 {
		last = last[:i]
	}
	return last
}

// Plugins reads the WasmPlugins and TrafficExtensions of a multi-document
// YAML string.
func Plugins(manifests string) ([]Plugin, error) {
	var plugins []Plugin
	for _, doc := range strings.Split(manifests, "\n---") {
		var m struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
			Spec map[string]any `json:"spec"`
		}
		if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
			return nil, fmt.Errorf("manifest: %v", err)
		}
		wasm := m.Spec
		switch m.Kind {
		case "WasmPlugin":
		case "TrafficExtension":
			wasm, _ = m.Spec["wasm"].(map[string]any)
		default:
			continue
		}
		p := Plugin{Kind: m.Kind, Name: m.Metadata.Name, Namespace: m.Metadata.Namespace}
		p.Phase, _ = m.Spec["phase"].(string)
		p.Priority, _ = m.Spec["priority"].(float64)
		p.URL, _ = wasm["url"].(string)
		p.FailStrategy, _ = wasm["failStrategy"].(string)
		p.PluginName, _ = wasm["pluginName"].(string)
		// Through JSON, so numbers are float64 as in any decoded JSON.
		raw, err := json.Marshal(wasm["pluginConfig"])
		if err != nil {
			return nil, err
		}
		if err := json.Unmarshal(raw, &p.PluginConfig); err != nil {
			return nil, err
		}
		plugins = append(plugins, p)
	}
	return plugins, nil
}
